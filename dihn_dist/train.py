"""python -m dihn_dist.train [--config FILE] [flags]: ADSH on the original classes (stage 1), then DIHN for the
new ones (stage 2), in one process or under torchrun.

The command line: flags and config files (`training.config`), the process group (`distributed.comm`), then
the stages (`training.loop`, which documents the algorithm).
"""
from __future__ import annotations

import sys

from loguru import logger

from .common import errors
from .data.prepared import hide_discarded_loader_noise
from .distributed import comm, machine
from .training.config import parse_config
from .training.loop import train


def main(argv=None) -> int:
    hide_discarded_loader_noise()
    rank_prefix = lambda: "error" if comm.context().world_size == 1 else f"error (rank {comm.context().rank})"  # noqa
    return errors.run_command(lambda: run_command_line(argv), debug=errors.debug_requested(argv), prefix=rank_prefix)


def run_command_line(argv) -> int:
    config = parse_config(argv)
    if config.deterministic:
        machine.make_deterministic()
    else:
        machine.fast_kernels()
    comm.init(config.device, config.collective_timeout)
    try:
        with comm.stop_on_sigterm:
            return train(config)
    except comm.StopRequested as stop:
        logger.warning(str(stop))
        return 143  # 128 + SIGTERM: the shell's convention for a run stopped by that signal
    finally:
        comm.shutdown()


if __name__ == "__main__":
    sys.exit(main())
