"""The three figures the scripts write, in one place. Each function imports matplotlib itself (the
Agg backend: files only, no display), so a run that never plots never pays for the import.

    plot_curve(path, metrics)                    reinforce.py -> OUT/curve.png      (after every update)
    plot_alpha(path, alpha, names)               cem.py       -> OUT/alpha.png      (the best α found)
    plot_confusion(path, matrix, labels, title)  dispatch.py  -> OUT/confusion.png  (pass 1's routing)
"""


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curve(path, metrics):
    """Training curve: the rate of right and of cut (hit --max-new-tokens) rollouts per update, the
    validation accuracy with its 95% Wilson interval, and the validation cut rate.
    `metrics`: reinforce.py's per-update dicts."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    t = [m for m in metrics if "train_acc" in m]  # --objective sft has no rollouts: validation only
    ax.plot([m["step"] for m in t], [m["train_acc"] for m in t], label="rollouts right", alpha=0.6)
    ax.plot([m["step"] for m in t if "cut" in m], [m["cut"] for m in t if "cut" in m], label="rollouts cut", alpha=0.6)
    v = [m for m in metrics if "valid_acc" in m]
    ax.errorbar([m["step"] for m in v], [m["valid_acc"] for m in v],
                yerr=[[m["valid_acc"] - m["valid_lo"] for m in v], [m["valid_hi"] - m["valid_acc"] for m in v]],
                fmt="o-", label="valid accuracy (95% CI)")
    vc = [m for m in v if "valid_cut" in m]  # greedy answers that ran into the cap: format, apart from accuracy
    ax.plot([m["step"] for m in vc], [m["valid_cut"] for m in vc], "s--", label="valid cut")
    ax.set_xlabel("update")
    ax.set_ylabel("fraction")
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_alpha(path, alpha, names):
    """One bar per expert: α (K,), or its mean over the matrices for a per-layer α (K, n_matrices)."""
    plt = _pyplot()
    a = alpha if alpha.dim() == 1 else alpha.mean(1)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(names, a.tolist())
    ax.set_ylabel("α" + (" (mean over matrices)" if alpha.dim() > 1 else ""))
    ax.set_ylim(0, 1)
    _save(plt, fig, path)


def plot_confusion(path, matrix, labels, title):
    """A confusion matrix with its counts written in: rows the true label, columns the predicted one."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, v, ha="center", va="center")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted (pass 1)")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    _save(plt, fig, path)
