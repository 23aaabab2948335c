"""The math: MonoSoup's coefficients, exact spectra by blocks, host LAPACK, low-rank SVDs from LoRA factors."""
