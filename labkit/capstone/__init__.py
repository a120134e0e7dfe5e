"""The capstone: a Kaggle-style challenge that combines the labs under a compute budget.

Read in this order:
  challenge.py    the task (digits under a mixture of shifts), the pool, the budget, the public data
  spec.py         what a submission may be (a declarative spec over safetensors files) and how it loads
  kinds.py        the models the spec's kinds build: ensemble rules, top-k MoE over classifiers, cascade
  cost.py         FLOPs per example (the hard gate) and measured latency
Tooling, which imports the files above and never the reverse:
  leaderboard.py  ``labkit leaderboard``: scoring on the hidden split, Kaggle's rules, CSV and HTML
  make_class.py   ``labkit capstone make-class``: a generated class folder with every case
"""
