"""Using a trained encoder: embed images, search them, find near-duplicates, export the backbone.

NNCLR (Dwibedi et al., ICCV 2021) is motivated by retrieval of semantically similar images; these
modules are what a user does with a pretrained encoder afterwards:

* :mod:`nnclr.use.embeddings`: the embedding directory (``embeddings.npy`` + ``index.csv`` +
  ``manifest.json``): writing it atomically, opening and checking it.
* :mod:`nnclr.use.embed`: resumable embedding of a folder or an ``nnclr.data`` data set, in one
  process or split over the processes of ``torchrun``.
* :mod:`nnclr.use.search`: exact cosine k-NN search in torch, and an optional faiss index.
* :mod:`nnclr.use.duplicates`: groups of near-duplicate images.
* :mod:`nnclr.use.gallery`: a self-contained HTML gallery (thumbnails as data URIs).
* :mod:`nnclr.use.export`: the backbone as safetensors (torchvision names), TorchScript or ONNX.
"""
