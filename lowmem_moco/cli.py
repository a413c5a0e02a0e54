"""`lowmem-moco train | eval | export | config | views | plan | rehearse | plot`, also as `python -m lowmem_moco` and under
`accelerate launch -m lowmem_moco`. User mistakes print one sentence, not a traceback."""

from __future__ import annotations

import argparse
import sys
import warnings

from rich.console import Console
from rich.markup import escape

from .errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowmem-moco", description="Memory-efficient MoCo v2 on one GPU (or a CPU).")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train MoCo v2 from a recipe; resumes when output_dir has a checkpoint")
    t.add_argument("recipe", help="a YAML recipe, e.g. recipes/demo.yaml")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=10")
    e = sub.add_parser("eval", help="kNN or linear probe of a run's backbone on frozen features")
    e.add_argument("mode", choices=["knn", "linear"])
    e.add_argument("run_dir", help="the output_dir of a training run")
    e.add_argument("overrides", nargs="*", help="e.g. data.source=cifar10 data.root=/data eval.knn_k=200")
    e.add_argument("--epochs", type=int, default=100, help="linear probe epochs")
    e.add_argument("--protocol", choices=["cached", "paper"], default="cached",
                   help="linear: 'cached' trains on centre-crop features computed once (fast); 'paper' on "
                        "augmented crops every epoch, SGD lr 30 decayed at 60%% and 80%% (the MoCo papers' number)")
    e.add_argument("--head", action="store_true",
                   help="features after the projection head (model.head) instead of the backbone's "
                        "(kNN default: the run's eval.knn_features)")
    c = sub.add_parser("config", help="print the resolved configuration of a recipe and overrides, validated")
    c.add_argument("recipe", help="a YAML recipe, e.g. recipes/cifar10_resnet18.yaml")
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. augment.blur_prob=0")
    v = sub.add_parser("views", help="draw the two training views of the first N images, as training makes them")
    v.add_argument("recipe", help="a YAML recipe")
    v.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.augment=batched")
    v.add_argument("--out", default="views.png", help="the picture: each image's query and key view side by side")
    v.add_argument("--n", type=int, default=16, help="how many training images (the first N)")
    v.add_argument("--tensor", help="also save the views as a uint8 tensor (N, 2, 3, S, S), before normalisation")
    x = sub.add_parser("export", help="write a run's backbone as timm-loadable safetensors")
    x.add_argument("run_dir")
    x.add_argument("--out", help="output file (default: RUN_DIR/backbone.safetensors)")
    pl = sub.add_parser("plan", help="predict a recipe's peak GPU memory on any machine; find what fits a GPU")
    pl.add_argument("recipe")
    pl.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.micro_batch_size=64")
    pl.add_argument("--gpu", help="t4, l4, a100-40, a100-80 or h100: its capacity and native precision; "
                                  "auto: this machine's CUDA GPU")
    pl.add_argument("--budget-gb", type=float, help="a memory budget in GiB instead of --gpu")
    pl.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    rh = sub.add_parser("rehearse", help="run a recipe's training steps on fake CUDA tensors as on that GPU: device "
                                         "and dtype errors, host-device syncs per step, CUDA operators, peak")
    rh.add_argument("recipe")
    rh.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.micro_batch_size=64")
    rh.add_argument("--gpu", required=True, help="t4, l4, a100-40, a100-80 or h100: its compute capability decides "
                                                 "the precision, as in training")
    rh.add_argument("--steps", type=int, default=2, help="optimizer steps (the second sees optimizer state and a "
                                                         "filled queue)")
    rh.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    cv = sub.add_parser("plot", help="draw runs' training curves (loss, lr, kNN, img/s, memory) from metrics.jsonl")
    cv.add_argument("runs", nargs="+", metavar="RUN", help="output_dirs of training runs; several share the axes")
    cv.add_argument("--out", default="curves.png", help="the picture to write")
    return p


def _train(args) -> int:
    from .config import load_config
    from .stopping import EXIT_CODE
    from .trainer import Trainer

    trainer = Trainer(load_config(args.recipe, args.overrides))
    trainer.fit()
    return EXIT_CODE if trainer.stopped else 0


def _eval(args) -> None:
    from .eval.run import evaluate_run

    evaluate_run(args.run_dir, args.mode, args.overrides, linear_epochs=args.epochs, protocol=args.protocol,
                 head=True if args.head else None)


def _config(args) -> None:
    from .backbones import backbone_plan_from_config
    from .config import config_yaml, load_config

    cfg = load_config(args.recipe, args.overrides)
    plan = backbone_plan_from_config(cfg)  # the model checks train makes first: timm name, kwargs, stem
    print(config_yaml(cfg), end="")
    for note in plan.notes:  # on stderr, so that stdout stays YAML
        print(f"note: {note}", file=sys.stderr)


def _views(args) -> None:
    from .config import load_config
    from .data.view_grid import save_views

    print(f"wrote {save_views(load_config(args.recipe, args.overrides), args.n, args.out, args.tensor)}")


def _export(args) -> None:
    from .eval.run import export_run

    print(f"wrote {export_run(args.run_dir, args.out)}")


def _plan(args) -> None:
    from .plan.report import main as plan_main

    plan_main(args.recipe, args.overrides, args.gpu, args.budget_gb, args.json)


def _rehearse(args) -> int:
    from .plan.rehearse import main as rehearse_main

    return rehearse_main(args.recipe, args.overrides, args.gpu, args.steps, args.json)


def _plot(args) -> None:
    from .curves import save_curves

    print(f"wrote {save_curves(args.runs, args.out)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    warnings.showwarning = lambda message, category, *a, **k: err.print(f"[yellow]warning:[/] {escape(str(message))}")
    try:
        code = {"train": _train, "eval": _eval, "export": _export, "config": _config, "views": _views,
                "plan": _plan, "rehearse": _rehearse, "plot": _plot}[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        err.print(f"[bold red]error:[/] {escape(str(e))}")  # messages may hold [brackets]
        return 2
    except KeyboardInterrupt:
        err.print("interrupted; run the same command again to resume from the last checkpoint")
        return 130
    return code or 0
