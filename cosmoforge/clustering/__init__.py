"""Topic clustering of web seed data, after Cosmopedia: embed, k-means, label, keep the good topics.

Submodules are imported on use (`cosmoforge.clustering.pipeline` pulls in faiss and, for the
default model, torch); this package itself stays cheap to import.
"""
