"""Writers of the two artifacts: the AIU checkpoint (aiu.py) and the CPU fake-quant variant (cpu.py)."""
