"""What the GPU-or-CPU benchmarks share: the model at the machine's sizes, and where results go."""
import json
import os
from pathlib import Path


def machine(preset_name: str):
    """(ModelConfig, torch device, device name): real presets in bf16 on a GPU; on CPU up to 8 threads, or
    OMP_NUM_THREADS when set (a shared box: more threads than free cores make a tiny model 30x slower)."""
    import torch

    from minigpt4.model import preset

    gpu = torch.cuda.is_available()
    dtype = {"llm_dtype": "bf16", "vision_dtype": "bf16"} if gpu and preset_name != "tiny" else {}
    if not gpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(os.cpu_count() or 1, 8)))
    name = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    return preset(preset_name, **dtype), torch.device("cuda" if gpu else "cpu"), name


def write_results(out: str, stem: str, table: str, payload: dict) -> None:
    """Print the table and write `<out>/<stem>.md` (the table) and `<stem>.json` (payload)."""
    print(table)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{stem}.md").write_text(table + "\n")
    (path / f"{stem}.json").write_text(json.dumps(payload, indent=1))
