"""The toy world: the sanity stream's seven tasks (sanity.py) and the tiny LLaVA that learns them on a
laptop CPU (tiny_llava.py)."""
