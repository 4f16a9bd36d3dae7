"""Everything that makes and describes per-personality LoRA adapters.

`personalities.yaml` is the manifest the service reads; `sources` turns real
conversation data into (pika_turn, user_turn, main_response) triples.
"""
