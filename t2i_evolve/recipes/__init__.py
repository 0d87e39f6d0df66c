"""Recipes: each method as one readable loop over the shared parts (evolve: EvolveDirector)."""
