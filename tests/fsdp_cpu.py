"""FSDP2 on CPU processes (gloo), driven the way `accelerate launch --config_file training/accelerate/fsdp2.yaml`
drives it on GPUs. Test-side only: nothing here ships.

Why a shim: accelerate does not run FSDP on CPU.
- `accelerate launch --cpu` goes to the simple launcher, which sets no `FSDP_*` variables
  (`accelerate/commands/launch.py::launch_command`, 1.15 lines 1390-1413).
- `AcceleratorState.__init__` turns a run into `DistributedType.FSDP` only inside its branch for GPU-like
  distributed types (MULTI_GPU, MULTI_NPU, ...; `accelerate/state.py` lines 986-1016); a CPU process is MULTI_CPU
  (`state.py` 800-808), so the Trainer silently falls back to DDP.

What the shim does, and nothing more:
1. `launch_environment` computes the launch environment from the shipped config with accelerate's own code
   (`launch_command_parser`, `_validate_launch_command`, `prepare_multi_gpu_env`, the path `accelerate launch`
   takes for this config), overriding only the number of processes, the layer classes to wrap (a text-only tiny
   backbone's; a tiny Qwen2.5-VL keeps the shipped ones) and mixed precision ("no": no bf16 on CPU). CPU is forced
   by `ACCELERATE_USE_CPU` and the recipe's `use_cpu: true`.
2. `enable_fsdp_on_cpu`, called in each worker before anything builds an `AcceleratorState`, wraps
   `AcceleratorState.__init__`: when accelerate has built a MULTI_CPU state and an FSDP plugin was given (the
   `Accelerator` builds it from the `FSDP_*` variables), it does what that GPU branch does —
   `distributed_type = FSDP`, `fsdp_plugin = plugin` (mixed precision set on it when not "no").
Everything after that is accelerate's and torch's own code: `fsdp2_prepare_model` / `fully_shard` on torch's
default mesh (a CPU mesh when CUDA is absent), FSDP state dicts, `save_fsdp_model` / `load_fsdp_model`
checkpoints, `get_state_dict`.
"""

import functools
from pathlib import Path

SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "training" / "accelerate" / "fsdp2.yaml"


def launch_environment(
    layer_classes: str | None, num_processes: int = 2, port: int = 29500, config=SHIPPED_CONFIG
) -> dict:
    """The `ACCELERATE_*` / `FSDP_*` variables `accelerate launch --config_file CONFIG` gives each process, computed
    by accelerate itself, plus the torchrun variables common to all ranks and `ACCELERATE_USE_CPU`. `layer_classes`
    overrides the config's `fsdp_transformer_layer_cls_to_wrap`; None keeps the config's."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = [
        "--config_file",
        str(config),
        "--num_processes",
        str(num_processes),
        "--mixed_precision",
        "no",
        *(["--fsdp_transformer_layer_cls_to_wrap", layer_classes] if layer_classes is not None else []),
        "--main_process_port",
        str(port),
        "-m",
        "metaembed_training.train",
    ]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if not args.use_fsdp:
        raise ValueError(f"{config} is not an FSDP config")
    full = prepare_multi_gpu_env(args)
    environment = {k: v for k, v in full.items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    environment.update(
        ACCELERATE_USE_CPU="true",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(args.main_process_port),
        WORLD_SIZE=str(num_processes),
        LOCAL_WORLD_SIZE=str(num_processes),
    )
    return environment


def enable_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP path run on a MULTI_CPU state (see the module docstring). Idempotent."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_fsdp_on_cpu", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # The body of state.py's branch for GPU-like types, applied to MULTI_CPU.
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            from accelerate.state import PartialState

            PartialState._shared_state["distributed_type"] = self.distributed_type

    __init__._fsdp_on_cpu = True
    AcceleratorState.__init__ = __init__


def start_worker(environment: dict, rank: int) -> None:
    """In a spawned worker: the variables torchrun would set for `rank`, one thread, FSDP enabled on CPU."""
    import os

    os.environ.update(environment)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    enable_fsdp_on_cpu()
