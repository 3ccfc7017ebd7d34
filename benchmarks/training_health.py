"""Does the chapter's recipe train healthily? Per-epoch losses and code use.

Run by hand (never by the tests); 3-5 minutes per run on 2 CPU cores:

    python benchmarks/training_health.py --workdir /tmp/dlfb_health
    python benchmarks/training_health.py --lookup euclidean   # the book's quantizer
    python benchmarks/training_health.py --setting second     # the second style

Trains the chapter's model and optimizer exactly as the chapter does
(`LocalizationModel(embedding_dim=64, num_embeddings=512, commitment_cost=0.25,
dropout_rate=0.45, classification_head_layers=2)`, `optax.adam(1e-3)`,
`classification_weight=1`, batch 128) with the public API on the demo's
embedded sample (`demo.EMBEDDED_SAMPLE`, or its second generator style),
split 80/20 by field of view, and prints a Markdown table of the per-epoch
means of the training losses, the perplexity, the mean norms of the encoder's
outputs and of the codes, and the validation total, followed by what the
health monitor flagged. A healthy run's codebook and commitment losses are flat
or falling after the first epoch.
"""

import argparse
import dataclasses
import warnings
from pathlib import Path

import jax
import optax

from dlfb_localization import demo
from dlfb_localization.dataset.builder import DatasetBuilder
from dlfb_localization.dataset.synthetic import SECOND_STYLE, write_release
from dlfb_localization.dataset.utils import count_unique_proteins
from dlfb_localization.health import TrainingHealthWarning
from dlfb_localization.hugepages import restart_with_huge_pages
from dlfb_localization.model import LocalizationModel
from dlfb_localization.model.codebook import LOOKUPS, CodebookOptions
from dlfb_localization.train import train

COLUMNS = (
    "total_loss",
    "recon_loss",
    "codebook_loss",
    "commitment_loss",
    "classification_loss",
    "perplexity",
    "latent_norm",
    "codebook_norm",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dlfb_health"))
    parser.add_argument("--setting", choices=("default", "second"), default="default")
    parser.add_argument("--lookup", choices=LOOKUPS, default=LOOKUPS[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    spec = demo.EMBEDDED_SAMPLE
    if args.setting == "second":
        spec = dataclasses.replace(spec, style=SECOND_STYLE)
    data = args.workdir / f"data_{args.setting}"
    write_release(data, spec)
    rng_split, rng_init, rng_train = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    splits = DatasetBuilder(data).build(
        rng=rng_split, splits={"train": 0.8, "valid": 0.2}, exclusive_by="fov_id"
    )
    model = LocalizationModel(
        num_classes=count_unique_proteins(splits),
        embedding_dim=64,
        num_embeddings=512,
        commitment_cost=0.25,
        dropout_rate=0.45,
        classification_head_layers=2,
        codebook=CodebookOptions(lookup=args.lookup),
    )
    state = model.create_train_state(
        rng_init, splits["train"].get_dummy_input(), optax.adam(1e-3)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TrainingHealthWarning)
        _, metrics = train(
            state, rng_train, splits, args.epochs, 128, 1.0, eval_every=1
        )

    print(
        f"\n## {args.setting} generator, {args.lookup} lookup, seed {args.seed}: "
        f"{len(splits['train'])} training frames\n"
    )
    print("| epoch | " + " | ".join(COLUMNS) + " | valid total |")
    print("|---|" + "---|" * (len(COLUMNS) + 1))
    for epoch in range(args.epochs):
        cells = [f"{metrics['train'][n][epoch]['mean']:.4g}" for n in COLUMNS]
        valid = metrics["valid"]["total_loss"][epoch]["mean"]
        print(f"| {epoch + 1} | " + " | ".join(cells) + f" | {valid:.4g} |")
    flagged = [w for w in caught if issubclass(w.category, TrainingHealthWarning)]
    print("\nHealth monitor: " + ("nothing flagged" if not flagged else ""))
    for warning in flagged:
        print(f"- {warning.message}")


if __name__ == "__main__":
    # Measures what the command line runs: malloc with huge pages, unless
    # GLIBC_TUNABLES says otherwise (`dlfb_localization.hugepages`).
    restart_with_huge_pages()
    main()
