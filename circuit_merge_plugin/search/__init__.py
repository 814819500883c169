"""``circuit-merge search``: choose the priority order and parameters with the user's eval.

Modules (pure Python unless noted):

* :mod:`.space`: the recipe, the search space (``--space`` / ``--fix``), exhaustive
  enumeration and the trial points;
* :mod:`.evaluation`: loading ``--eval`` functions and running ``--eval-cmd``;
* :mod:`.trial`: one trial in memory (mergekit's planner and the kernel, torch);
* :mod:`.engine`: the Ray workers and the search loop (Optuna's TPE or a grid);
* :mod:`.outputs`: ``trials.jsonl``, ``leaderboard.md``, ``best.yaml``, charts;
* :mod:`.command`: the click command.

A front end: it may import core, io and adapters; nothing below imports it.
"""
