"""Adapters to the codebases KNE users already work in."""
