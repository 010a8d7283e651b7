"""Serving the codes: FAISS binary indexes (`faiss_index`), writing or appending one (`export`), and
retrieval with a contact sheet (`retrieve`)."""
