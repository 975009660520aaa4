"""`asymoe analyze`: the AsyMoE paper's grounding measurements, expert specialisation and image sensitivity.

- :mod:`asymoe.analysis.measures`: the measurements on tensors (Eqs. 2-6), each reading stated;
- :mod:`asymoe.analysis.capture`: attention probabilities, routing and evidence gates of a forward;
- :mod:`asymoe.analysis.conditions`: blank image, shuffled question, swapped image;
- :mod:`asymoe.analysis.tally` / :mod:`asymoe.analysis.results`: accumulation and final values;
- :mod:`asymoe.analysis.run`: the command (`analyze`); :mod:`asymoe.analysis.report` and
  :mod:`asymoe.analysis.plots`: analysis.json, analysis.md, PNGs, TensorBoard;
- :mod:`asymoe.analysis.cells`: grid hooks (torch-free): analysing cells, reading their scalars.
"""
