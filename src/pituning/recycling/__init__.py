"""Reusing an expert library: merges, gradient-free mixture weights, routing, controls and source-free ranking.

Plain torch over :class:`~pituning.bank.Expert` records and live :class:`~pituning.model.ExpertModel` pools; the
methods that train (π-Tuning, best source as initialisation) are run by :mod:`pituning.methods`.
"""
