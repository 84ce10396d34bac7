"""The reliability protocols' commands, one per row of `tasks.protocols.PROTOCOLS`: `sanity`, `invariance`,
`manipulate`, `roar`."""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from .options import add_study_options, spec_from_args


def add_protocol_parsers(sub: Any) -> None:
    from tasks.protocols import PROTOCOLS
    from tasks.spec import options_of

    for name, p in PROTOCOLS.items():
        parser = sub.add_parser(name, help=p.help, description=p.help[0].upper() + p.help[1:] + ". The same options "
                                f"are the parameters of the `{name}` flow in the Prefect UI.", epilog=p.examples,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        add_study_options(parser, options_of(p.spec))
        parser.add_argument("--json", action="store_true", help="print the result as JSON only")
        parser.set_defaults(func=cmd_protocol, computes=True)


def cmd_protocol(args: argparse.Namespace) -> None:
    from flows.protocols import FLOWS
    from flows.running import task_runner
    from tasks.protocols import PROTOCOLS
    from tasks.spec import options_of

    p = PROTOCOLS[args.command]
    spec = spec_from_args(p.spec, options_of(p.spec), args)
    task_runner(spec.workers, spec.dask_address, spec.device)  # --workers, --dask-address, --device
    p.opened(spec)  # every argument checked, the store opened or refused, before the flow starts (which reuses it)
    result = FLOWS[args.command](**dataclasses.asdict(spec))
    if args.json:
        print(json.dumps(result))
        return
    print(f"store:   {spec.store}")
    if spec.figure:
        print(f"figure:  {spec.figure}")
    print(json.dumps(result, indent=1))
