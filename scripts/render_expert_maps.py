"""Render what the router did on the bundled CT: CT, mask and dominant expert side by side.

Segments the bundled CT with the demo weights and ``explain`` (the same call as
``mome segment --explain``), then draws, for each structure, an axial slice through it (the coronal
slice for the aorta, which runs along the body): the CT, the CT with the mask, and the dominant-expert
map inside the body with the mask's outline on top. Written to ``docs/images/expert_maps.png``; the
per-structure mean gates inside and at the border are printed (the README quotes them).

    .venv/bin/python scripts/render_expert_maps.py [--output docs/images/expert_maps.png]

About half a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PROMPTS = "liver, aorta, left kidney, right kidney"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO_ROOT / "docs" / "images" / "expert_maps.png"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from scipy import ndimage

    from MoMESegmentationLib.data.sample import load_sample_ct
    from MoMESegmentationLib.engine import Segmenter
    from MoMESegmentationLib.io.geometry import canonicalize

    ct = load_sample_ct().image
    segmenter = Segmenter("demo", "cpu", threads=args.threads)
    result = segmenter.segment(ct, PROMPTS, explain=True)
    explanation = result.explanation
    summary = result.summary()
    print(json.dumps({s["name"]: s["routing"] for s in summary["structures"]}, indent=1))

    def ras(array):
        return canonicalize(ct.with_array(array), "RAS")[0]

    image = ras(np.asarray(ct.array, np.float32))
    spacing = image.spacing
    experts = explanation.experts
    colors = np.zeros((len(experts) + 1, 4))
    for x in experts:
        colors[x.label] = (*[c / 255 for c in x.color], 1.0)
    expert_cmap = ListedColormap(colors)

    rows = [s for s in result.structures if s.found]
    fig, axes = plt.subplots(len(rows), 3, figsize=(11, 3.7 * len(rows)), facecolor="black")
    axes = np.atleast_2d(axes)
    for row, structure in zip(axes, rows):
        k = structure.label - 1
        mask = ras(result.masks[k].astype(np.uint8)).array > 0
        dominant = ras(explanation.dominant[k]).array
        if structure.id == "aorta":  # a tube along the body: a coronal slice shows it whole
            index = int(np.argmax(mask.sum(axis=(0, 2))))
            take = (lambda a: a[:, index, :].T[:, ::-1])  # noqa: E731
            aspect, view = spacing[2] / spacing[0], f"coronal {index}"
        else:
            index = int(np.argmax(mask.sum(axis=(0, 1))))
            take = (lambda a: a[:, :, index].T[::-1, ::-1])  # noqa: E731
            aspect, view = spacing[1] / spacing[0], f"axial {index}"
        origin = "lower" if structure.id == "aorta" else "upper"
        slab_ct, slab_mask, slab_dom = take(image.array), take(mask), take(dominant)
        edge = slab_mask & ~ndimage.binary_erosion(slab_mask)
        body = take(image.array > -500)
        routing = explanation.routing[k]
        inside = experts[int(np.argmax(routing.inside))].name
        border = experts[int(np.argmax(routing.border))].name if routing.border is not None else "-"
        titles = (f"{structure.name}: CT ({view})", f"mask ({structure.volume_ml:.0f} mL)",
                  f"dominant expert\ninside: {inside}; border: {border}")
        for ax, title in zip(row, titles):
            ax.imshow(slab_ct, cmap="gray", vmin=-175, vmax=250, aspect=aspect, origin=origin,
                      interpolation="nearest")
            ax.set_title(title, color="white", fontsize=9)
            ax.axis("off")
        color = [c / 255 for c in structure.color]
        row[1].imshow(np.ma.masked_where(~slab_mask, np.ones_like(slab_ct)), cmap=ListedColormap([color]),
                      alpha=0.6, aspect=aspect, origin=origin, interpolation="nearest")
        row[2].imshow(np.ma.masked_where(~body | (slab_dom == 0), slab_dom), cmap=expert_cmap, vmin=0,
                      vmax=len(experts), alpha=0.75, aspect=aspect, origin=origin, interpolation="nearest")
        row[2].imshow(np.ma.masked_where(~edge, np.ones_like(slab_ct)), cmap=ListedColormap(["white"]),
                      aspect=aspect, origin=origin, interpolation="nearest")
    handles = [Patch(color=[c / 255 for c in x.color], label=x.name) for x in experts]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white",
               fontsize=9)
    fig.suptitle("MoME demo weights on the bundled CT: which decoder scale the router trusted",
                 color="white", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=72, facecolor="black")
    plt.close(fig)
    try:  # a 256-colour PNG keeps the repository small
        from PIL import Image

        Image.open(output).convert("RGB").quantize(256).save(output, optimize=True)
    except ImportError:
        pass
    print(f"wrote {output} ({output.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
