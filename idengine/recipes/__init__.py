"""Recipes: the only modules that compose steps, one per command (prepare, cv, tune, train), each readable top to
bottom. Everything they call is a plain function of data/, models/, features/, train/, evaluate/, deploy/ or report/.
"""
