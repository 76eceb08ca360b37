"""Scoring an edited model: edit success, generalisation and locality (`metrics`), generation, CounterFact's
probability scores, prefix-conditioned evaluation, the optional extra metrics and logged samples."""
