"""Evaluating pretrained encoders: the kNN monitor and rule, a cached-feature linear probe, the
one-command evaluation of a finished pretraining run and the study runner that compares curricula."""
