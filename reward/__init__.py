"""Reward models: Bradley-Terry training on preference pairs, scoring, evaluation."""
