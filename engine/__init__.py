"""The machinery under the continual loop, so that train_stream.py reads as the loop alone.

    flags.py       command-line settings: default, help and allowed range in one declaration
    runs.py        a run directory (config, per-step log, state, checkpoints), written whole or not at all
    steps.py       the schedule and the optimizer step that every training loop uses; the step log
    processes.py   torchrun's processes and devices, the one check of torch.distributed
    memory.py      the memory plan of a run (--dry-run), from a model built on the meta device

Nothing here knows the method: torch and the standard library only (runs.py asks transformers for its
version, to record it). memory.py alone knows the model's shape: LLaVA's module names and a Llama
decoder layer's tensors.
"""
