"""Retrieval: encoding collections, indexes (FAISS, Milvus), re-ranking, the search service, ONNX."""
