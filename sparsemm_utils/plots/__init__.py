"""Figure helpers for the notebooks (matplotlib/seaborn), one module per stage."""
