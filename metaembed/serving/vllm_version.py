"""The vLLM releases the plugin is tested with, and the refusal of others (no vLLM import: testable anywhere)."""

import os
import re

# [low, high) of the tested vLLM releases: keep equal to the bound of the `vllm` extra in pyproject.toml.
TESTED_VLLM = ((0, 32), (0, 33))


def check_vllm_version(found: str) -> None:
    """Refuse a vLLM this plugin was not tested with (it reaches private vLLM names: `vllm_api`), naming what was
    expected and what was found. METAEMBED_ALLOW_UNTESTED_VLLM=1 tries anyway."""
    release = re.match(r"(\d+)\.(\d+)", str(found))
    if release and TESTED_VLLM[0] <= (int(release[1]), int(release[2])) < TESTED_VLLM[1]:
        return
    if os.environ.get("METAEMBED_ALLOW_UNTESTED_VLLM") == "1":
        return
    low, high = (".".join(map(str, version)) for version in TESTED_VLLM)
    raise RuntimeError(
        f"the metaembed vLLM plugin is tested with vllm>={low},<{high}, found vllm {found}: install "
        f"a tested vLLM, or set METAEMBED_ALLOW_UNTESTED_VLLM=1 to try this one (it uses private vLLM "
        f"names, listed in metaembed/serving/vllm_api.py)"
    )


__all__ = ["TESTED_VLLM", "check_vllm_version"]
