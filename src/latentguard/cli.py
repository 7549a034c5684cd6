"""Command-line interface: parsing, validation, exit codes and atomic output directories.

User errors (``LatentGuardError``) print one line ``latentguard: error: ...`` and exit 2; an interrupt exits
130 and leaves no half-written output. Algorithms live in the library, never here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from latentguard.errors import LatentGuardError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (what is wrong + where to look), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}: see '{self.prog} --help'\n")


# ----------------------------------------------------------------------------- shared arguments
def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same result on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default: torch's, one per core); set it to the free cores when "
                        "other jobs share the machine, or the threads oversubscribe the cores and everything slows")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="built-in name, FILE.py:callable, or a model.json / directory written by latentguard")
    p.add_argument("--weights", default=None,
                   help=".pt/.pth state_dict (loaded with weights_only=True) or .safetensors; "
                   "optional when --model is a latentguard model directory")
    p.add_argument("--head", default=None, help="name of the final nn.Linear if it cannot be found automatically")
    p.add_argument("--width", type=int, default=None, help="width of a built-in architecture")


def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (written atomically, never over an input)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out directory")


def _add_training(p: argparse.ArgumentParser, *, width: int | None, epochs: int) -> None:
    """The training options shared by ``train``, ``attack`` and ``zoo build`` (one SGD schedule for all)."""
    p.add_argument("--width", type=int, default=width, help="width of a built-in architecture")
    p.add_argument("--epochs", type=_nonnegative_int, default=epochs)
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    p.add_argument("--batch-size", type=_nonnegative_int, default=128)


def _parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``k=v`` pairs; values parsed as JSON when possible (numbers, booleans, lists), else kept as strings."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise LatentGuardError(f"--param {item!r} must look like name=value")
        key, value = item.split("=", 1)
        if not key.strip():
            raise LatentGuardError(f"--param {item!r} has no name: write it as name=value")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _parse_attack_params(items: Sequence[str] | None, attacks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``attack.name=value`` pairs → {attack: {name: value}}; the attack must be one being built."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or ():
        head = item.split("=", 1)[0]
        if "." not in head:
            raise LatentGuardError(f"--attack-param {item!r} must look like attack.name=value, e.g. inputaware.mask_epochs=5")
        attack, rest = item.split(".", 1)
        if attack not in attacks:
            raise LatentGuardError(f"--attack-param {item!r} names attack {attack!r}, which is not in --attacks")
        out.setdefault(attack, {}).update(_parse_params([rest]))
    from latentguard.attacks import ATTACKS

    for attack, params in out.items():  # fail now rather than after the data are loaded
        try:
            ATTACKS[attack].check_params(params)
        except LatentGuardError as exc:
            raise LatentGuardError(f"--attack-param: {exc}") from None
    return out


def _nonnegative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {v}")
    return v


def _positive_int(text: str) -> int:
    v = _nonnegative_int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {v}")
    return v


def _finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _in_unit_interval(text: str, *, zero: bool) -> float:
    """A number in [0, 1] (``zero``) or (0, 1]; the message names the interval."""
    interval = "[0, 1]" if zero else "(0, 1]"
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
    if not (0.0 <= v if zero else 0.0 < v) or not v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {v}")
    return v


def _fraction(text: str) -> float:
    return _in_unit_interval(text, zero=False)


def _unit(text: str) -> float:
    return _in_unit_interval(text, zero=True)


# ----------------------------------------------------------------------------- commands
def _cmd_train(args: argparse.Namespace) -> int:
    from latentguard import workflows

    result = workflows.train_command(
        data=args.data, model=args.model, width=args.width, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, out=args.out, overwrite=args.overwrite, device=args.device, seed=args.seed,
        progress=not args.quiet,
    )
    workflows.print_metrics_table("train", {"test ACC": result["metrics"]["acc"]})
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from latentguard import workflows

    result = workflows.evaluate_command(
        data=args.data, model=args.model, weights=args.weights, head=args.head, width=args.width,
        attack=args.attack, repair=args.repair, out=args.out, overwrite=args.overwrite, device=args.device,
    )
    workflows.print_metrics_table("evaluate", result["metrics"])
    return 0


def _cmd_attack(args: argparse.Namespace) -> int:
    from latentguard import workflows

    result = workflows.attack_command(
        data=args.data, attack=args.attack, target=args.target, rate=args.rate, all_to_all=args.all_to_all,
        params=_parse_params(args.param), model=args.model, width=args.width, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, out=args.out, overwrite=args.overwrite, device=args.device, seed=args.seed,
        progress=not args.quiet,
    )
    workflows.print_metrics_table("attack", result["metrics"])
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from latentguard import zoo

    root = Path(args.root) if args.root else zoo.default_zoo_root()
    if args.action == "table":
        print(zoo.write_table(root, args.out).read_text())
        return 0
    attacks = [a for a in args.attacks.split(",") if a]
    from latentguard.attacks import ATTACKS

    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise LatentGuardError(f"unknown attack(s) {', '.join(unknown)}: choose from {', '.join(sorted(ATTACKS))}")
    config = zoo.ZooConfig(model=args.model, width=args.width, epochs=args.epochs, lr=args.lr,
                           batch_size=args.batch_size, rate=args.rate, target=args.target, seed=args.seed,
                           attack_params=_parse_attack_params(args.attack_param, attacks))
    for dataset in [d for d in args.datasets.split(",") if d]:
        spec = zoo.data_spec_for(dataset, args.data_root)
        from latentguard.data import load_data

        splits = None
        needs_clean = not args.skip_clean or any(ATTACKS[a].needs_preparation for a in attacks)
        for cell in [None, *attacks] if needs_clean else attacks:
            if zoo.is_done(zoo.cell_dir(root, dataset, cell or "clean")):
                print(f"{dataset}/{cell or 'clean'}: done, skipped")
                continue
            splits = splits or load_data(spec)
            rec = zoo.build_cell(root, dataset, spec, cell, config, device=args.device, progress=not args.quiet,
                                 splits=splits)
            m = rec["metrics"]
            asr = "" if m.get("asr") is None else f" ASR {100 * m['asr']:.1f}%"
            print(f"{dataset}/{cell or 'clean'}: ACC {100 * m['acc']:.1f}%{asr} in {m['minutes']:.1f} min", flush=True)
    print(zoo.write_table(root).read_text())
    return 0


def _add_clean(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clean", required=True, help="the defender's clean data (a data spec); its training split is used")
    p.add_argument("--clean-fraction", type=_fraction, default=None,
                   help="use only a class-balanced share of the clean training split")
    p.add_argument("--clean-indices", default=None, help="JSON file with the indices to use (e.g. reserve_indices.json)")


def _defender_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(model=args.model, weights=args.weights, head=args.head, width=args.width, clean=args.clean,
                clean_fraction=args.clean_fraction, clean_indices=args.clean_indices, out=args.out,
                overwrite=args.overwrite, device=args.device, seed=args.seed)


def _cmd_detect(args: argparse.Namespace) -> int:
    from latentguard import workflows

    payload = workflows.detect_command(threshold=args.threshold, quantile=args.quantile, statistic=args.statistic,
                                       noise_probe=args.noise_probe, smooth_probe=args.smooth_probe,
                                       mad_floor=args.mad_floor, alignment=args.alignment, **_defender_kwargs(args))
    from rich.console import Console
    from rich.table import Table

    table = Table(title="TAC detection: " + (f"backdoor target(s) {payload['target_classes']}"
                                             if payload["backdoored"] else "no backdoor found"))
    extra = payload.get("extra", {})
    stat = "mean ‖s_a→k‖" if extra.get("statistic") == "pairwise" else "‖s_k‖"
    # the verdicts that ran beside the clean one (alignment, probes): show each index beside the combined one
    probes = [(key, title) for key, title in (("alignment_scores", "aligned"), ("probe_scores", "noisy"),
                                              ("smooth_scores", "smooth")) if key in extra]
    verdicts = ["clean", *(title for _, title in probes), "index"] if probes else ["anomaly index"]
    columns = ["class", "name", stat, *verdicts, "flagged"]
    for col in columns:
        table.add_column(col, justify="right")
    for k, (n, sc) in enumerate(zip(payload["norms"], payload["scores"], strict=True)):
        each = [f"{extra['clean_scores'][k]:.2f}", *(f"{extra[key][k]:.2f}" for key, _ in probes)] if probes else []
        table.add_row(str(k), payload["class_names"][k], f"{n:.3f}", *each, f"{sc:.2f}",
                      "yes" if k in payload["target_classes"] else "")
    Console().print(table)
    if probes:
        what = []
        if "noise_probe" in extra:
            what.append(f"white noise of σ {extra['noise_probe']:g}")
        if "smooth_probe" in extra:
            what.append(f"smooth noise of σ {extra['smooth_probe']:g} ({extra['smooth_grid']}×{extra['smooth_grid']} "
                        "lattice)")
        if what:
            print(f"index: the largest of the verdicts; the probes judge {extra.get('probe_size', '?')} noisy copies "
                  f"({' and '.join(what)})")
        if "alignment_scores" in extra:
            print("aligned: how much each class's minimal flip leans on its own mean clean latent (index of "
                  "‖s_k‖ / ‖s⊥_k‖)")
    print(f"threshold {payload['threshold']:g}, {payload['clean_size']} clean images, {payload['seconds']:.2f}s; "
          f"written to {args.out}")
    return 0


def _cmd_defend(args: argparse.Namespace, method: str | None = None, command: str = "defend") -> int:
    from latentguard import workflows

    record = workflows.defend_command(method=method or args.method, params=_parse_params(args.param),
                                      command=command, **_defender_kwargs(args))
    m = record["metrics"]
    workflows.print_metrics_table(f"{record['parameters']['method']} ({record['seconds']:.1f}s)", {
        "reserve ACC before": m["reserve_acc_before"], "reserve ACC after": m["reserve_acc_after"],
        "backdoored": m["backdoored"], "target classes": m["target_classes"]})
    print(f"written to {args.out}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from latentguard import bench, zoo
    from latentguard.defenses import DEFENSES

    root = Path(args.zoo) if args.zoo else zoo.default_zoo_root()
    defenses = [d for d in args.defenses.split(",") if d]
    unknown = [d for d in defenses if d not in DEFENSES]
    if unknown:
        raise LatentGuardError(f"unknown defense(s) {', '.join(unknown)}: choose from {', '.join(sorted(DEFENSES))}")
    datasets = {d: zoo.data_spec_for(d, args.data_root) for d in args.datasets.split(",") if d}
    try:
        params = json.loads(args.params) if args.params else {}
    except json.JSONDecodeError as exc:
        raise LatentGuardError(f"--params is not valid JSON ({exc.msg}): pass an object such as "
                               "'{\"tac\": {\"epochs\": 5}}'") from None
    if not isinstance(params, dict):
        raise LatentGuardError("--params must be a JSON object mapping defense names to parameter objects")
    bench.run_grid(root, args.out, datasets, [a for a in args.attacks.split(",") if a], defenses, params=params,
                   workers=args.workers, device=args.device, seed=args.seed, clean_fraction=args.clean_fraction,
                   log=lambda m: print(m, flush=True))
    print(bench.write_tables(args.out).read_text())
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from latentguard.report.build import build_report

    path = build_report(args.dir, data=args.data, attack=args.attack, device=args.device)
    print(f"report written to {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from latentguard import demo

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not (out / "demo.json").is_file():
        raise LatentGuardError(f"--out {out} exists and is not a previous demo output, so the demo will not replace "
                               "it: choose a new directory")
    demo.run(out=args.out, device=args.device, seed=args.seed, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="latentguard",
        description="Find, remove and neutralise backdoors in image classifiers through their latent space.",
    )
    from latentguard import __version__

    parser.add_argument("--version", action="version", version=f"latentguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a clean model on a dataset")
    p.add_argument("--data", required=True, help="digits, cifar10:PATH, gtsrb:PATH, tinyimagenet:PATH, npz:FILE or DIR")
    p.add_argument("--model", required=True, help="built-in architecture name")
    _add_training(p, width=None, epochs=20)
    _add_out(p)
    _add_runtime(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="ACC (and ASR/RA against a saved attack) of a model")
    p.add_argument("--data", required=True)
    _add_model(p)
    p.add_argument("--attack", default=None, help="attack.json written by 'latentguard attack'")
    p.add_argument("--repair", default=None, help="repair.pt written by 'latentguard repair'")
    p.add_argument("--out", default=None, help="optional output directory for evaluation.json")
    p.add_argument("--overwrite", action="store_true")
    _add_runtime(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("attack", help="train a backdoored model (to create test models)")
    p.add_argument("--data", required=True)
    p.add_argument("--attack", required=True, help="attack name (see 'latentguard attack --list')")
    p.add_argument("--target", type=_nonnegative_int, default=0)
    p.add_argument("--rate", type=_fraction, default=0.1)
    p.add_argument("--all-to-all", action="store_true")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="attack parameter (repeatable)")
    p.add_argument("--model", required=True, help="built-in architecture name")
    _add_training(p, width=None, epochs=20)
    _add_out(p)
    _add_runtime(p)
    p.set_defaults(func=_cmd_attack)

    p = sub.add_parser("detect", help="TAC detection of the poisoned class(es) from clean data")
    _add_model(p)
    _add_clean(p)
    p.add_argument("--threshold", type=_finite, default=None,
                   help="anomaly-index threshold α (default: TAC's, 4)")
    p.add_argument("--quantile", type=_fraction, default=1.0, help="fraction of clean samples that must flip")
    p.add_argument("--statistic", choices=("both", "class", "pairwise"), default="both",
                   help="class: the paper's per-class flip norm; pairwise: geometric mean over source classes of "
                        "the per-pair flip norm; both (default): the larger of the pairwise index and the "
                        "per-class index minus 1")
    p.add_argument("--noise-probe", type=_unit, default=None, metavar="SIGMA",
                   help="also judge the clean data under Gaussian pixel noise of this σ (0 to 1; 0: off) and flag "
                        "a class either verdict flags (default: TAC's)")
    p.add_argument("--smooth-probe", type=_unit, default=None, metavar="SIGMA",
                   help="also judge the clean data under smooth (low-frequency) noise of this σ (0 to 1; 0: off) "
                        "and flag a class any verdict flags (default: off; 0.3 is the σ chosen on development models)")
    p.add_argument("--mad-floor", type=_unit, default=None, metavar="SPREAD",
                   help="floor on the MAD of the log flip-norm statistics over the classes, a relative spread in [0, 1] "
                        "(default: TAC's; 0: the plain MAD)")
    p.add_argument("--alignment", action=argparse.BooleanOptionalAction, default=None,
                   help="also flag a class whose minimal flip leans on its own mean clean latent (default: on)")
    _add_out(p)
    _add_runtime(p)
    p.set_defaults(func=_cmd_detect)

    for verb, method, text in (("remove", "tac", "TAC-guided backdoor removal (writes new weights)"),
                               ("repair", "fire", "FIRE inference-time latent repair (writes repair.pt)")):
        p = sub.add_parser(verb, help=text)
        _add_model(p)
        _add_clean(p)
        p.add_argument("--param", action="append", metavar="NAME=VALUE", help=f"{method} parameter (repeatable)")
        _add_out(p)
        _add_runtime(p)
        p.set_defaults(func=lambda a, m=method, v=verb: _cmd_defend(a, m, v))

    p = sub.add_parser("defend", help="run any registered defense by name")
    p.add_argument("--method", required=True)
    _add_model(p)
    _add_clean(p)
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="defense parameter (repeatable)")
    _add_out(p)
    _add_runtime(p)
    p.set_defaults(func=_cmd_defend)

    p = sub.add_parser("zoo", help="build (resumable) or tabulate the zoo of backdoored models")
    p.add_argument("action", choices=["build", "table"])
    p.add_argument("--datasets", default="cifar10,gtsrb")
    p.add_argument("--attacks", default="badnets,blend,wanet,sig")
    p.add_argument("--root", default=None, help="zoo directory (default: the latentguard cache)")
    p.add_argument("--out", default=None, help="table: write zoo.md/zoo.json here instead of the zoo directory")
    p.add_argument("--data-root", default="../shared/datasets",
                   help="folder holding the CIFAR-10 / GTSRB archives or unpacked folders")
    p.add_argument("--model", default="preact_resnet18")
    _add_training(p, width=16, epochs=10)
    p.add_argument("--rate", type=_fraction, default=0.1)
    p.add_argument("--target", type=_nonnegative_int, default=0,
                   help="the target class of the cells built now (e.g. a larger class for a clean-label attack)")
    p.add_argument("--attack-param", action="append", metavar="ATTACK.NAME=VALUE",
                   help="an attack's parameter for the cells built now, e.g. inputaware.mask_epochs=5 (repeatable)")
    p.add_argument("--skip-clean", action="store_true",
                   help="train the dataset's clean model only when a listed attack needs it (LF, TrojanNN optimise "
                        "their trigger against it); by default it is built first")
    _add_runtime(p)
    p.set_defaults(func=_cmd_zoo)

    p = sub.add_parser("bench", help="run defenses on zoo models (resumable grid) and write tables")
    p.add_argument("--datasets", default="cifar10,gtsrb")
    p.add_argument("--attacks", default="clean,badnets,blend,wanet,sig")
    p.add_argument("--defenses", default="tac,fire")
    p.add_argument("--zoo", default=None, help="zoo directory (default: the latentguard cache)")
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--params", default=None, help='JSON: {"defense": {"param": value}}')
    p.add_argument("--workers", type=_nonnegative_int, default=1)
    p.add_argument("--clean-fraction", type=_fraction, default=None,
                   help="give each defense a class-balanced share of the cell's reserve holding this fraction of "
                        "the training set (default: the whole reserve)")
    p.add_argument("--out", required=True, help="results directory (appended to, resumable)")
    _add_runtime(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("report", help="Markdown report with plots for any latentguard output directory")
    p.add_argument("dir", help="an output directory of detect/remove/repair/defend/attack/evaluate/bench")
    p.add_argument("--data", default=None, help="data spec, to draw clean vs triggered latents")
    p.add_argument("--attack", default=None, help="attack.json, when the directory has none")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("demo", help="the whole story on the embedded digits data in about a minute")
    p.add_argument("--out", default="demo-out", help="output directory (replaced on each run)")
    _add_runtime(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def _install_interrupt_handlers(received: list[int]) -> dict[int, Any]:
    """SIGINT and SIGTERM raise KeyboardInterrupt and are recorded in ``received``; a second signal is ignored so
    an accidental double Ctrl-C cannot cut the cleanup short, a third one forces the interrupt again. Returns
    the previous handlers. Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum, frame):  # pragma: no cover - exercised via subprocess tests
        received.append(signum)
        if len(received) != 2:
            raise KeyboardInterrupt

    return {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``latentguard`` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed on one line
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USER_ERROR)
    received: list[int] = []
    previous = _install_interrupt_handlers(received)
    t0 = time.perf_counter()
    try:
        try:
            if getattr(args, "threads", None):
                from latentguard.device import set_threads

                set_threads(args.threads)
            return int(args.func(args) or 0)
        except Exception as exc:
            # An interrupt that lands inside an import or a library call can surface as another exception
            # (e.g. a RuntimeError wrapping the KeyboardInterrupt): it is still an interrupt.
            if received:
                raise KeyboardInterrupt from exc
            raise
    except LatentGuardError as exc:
        print(f"latentguard: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"latentguard: error: {exc.strerror or exc}{where}: check the path and its permissions",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"latentguard: interrupted after {time.perf_counter() - t0:.0f}s; no output was written",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run() -> None:  # pragma: no cover
    code = main()
    if code == EXIT_INTERRUPTED:
        # The output is already cleaned up. Exit at once: when the interrupt landed inside a nested interpreter
        # call (torch runs some imports that way), CPython would otherwise end the process by SIGINT after
        # finalisation instead of returning this exit code.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)



