"""The research instruments: the study, the benchmark, the analyses of a run's checkpoints and the
statistics that judge the claims. They import the reference (train_stream, evaluate, ...); nothing in
the reference imports them. Run them from the repository root: python -m lab.study DIR."""
