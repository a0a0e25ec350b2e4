"""What every `barlow-*` command shares: option parsing, exit statuses and output folders.

Both `training` and `hub` build their commands on this package; it imports neither of them.

* :func:`parse_arguments`: dataclasses of options -> instances, with `--config FILE`.
* :func:`run_command`: runs a command's body and turns its outcome into the exit status:
  0 on success, 1 when it failed or was stopped, 2 for an option or input to change, each with one line on
  stderr and no traceback.
* :func:`prepare_output_dir`: the output-folder policy of HF's trainers: refuse a folder that
  holds an earlier run unless told to overwrite or resume it.
"""

from .arguments import parse_arguments, read_config_file
from .command import CommandFailed, UsageError, run_command, setup_logging
from .output_dir import prepare_output_dir


__all__ = [
    "CommandFailed",
    "UsageError",
    "parse_arguments",
    "prepare_output_dir",
    "read_config_file",
    "run_command",
    "setup_logging",
]
