"""zoo.kernels: scan kernels, one folder per op (``naive.py`` reference, Triton implementation, public function)."""
