"""omnicore_dist: the torch runtime that applies omnicore's layouts across processes.

The only package that imports torch.distributed. It grows with the training runtime, tensor and
pipeline parallelism (see docs/architecture.md); today it holds nothing but this marker.
"""
