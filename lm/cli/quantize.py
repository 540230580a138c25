"""`lm quantize`: weight-only post-training quantization of a run into a new run
(lm/compress/ptq.py)."""

from __future__ import annotations

import json

from lm.cli.command import Command


def arguments(p) -> None:
    p.add_argument("run", help="run directory (its newest checkpoint is quantized)")
    p.add_argument("--out", required=True, help="the new run directory (must not exist or "
                                                "be empty)")
    p.add_argument("--weights", required=True, help="int8 | int4")
    p.add_argument("--group-size", type=int, default=0, metavar="G",
                   help="one scale per G fan-in rows of each output channel (0 = per "
                        "channel; int4: even, dividing every matrix's fan-in)")
    p.add_argument("--calib-batches", type=int, default=4, metavar="N",
                   help="validation batches the loss before / after is measured on")


def quantize(args) -> int:
    from lm.compress.ptq import quantize_run
    report = quantize_run(args.run, args.out, args.weights, args.group_size,
                          args.calib_batches)
    print(json.dumps({k: report[k] for k in ("weights", "group_size", "bytes_before",
                                             "bytes_after", "loss_before", "loss_after")}))
    return 0


COMMANDS = [
    Command("quantize", "weight-only post-training quantization (int8 / int4) of a run's "
                        "mixers into a new run", arguments, quantize),
]
