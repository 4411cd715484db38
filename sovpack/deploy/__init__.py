"""Deployments of a verified bundle on many hosts: Kubernetes manifests for verify-first pods (docs/kubernetes.md).

`sovpack deploy kubernetes NAME --ref REGISTRY/REPO:TAG` writes plain manifests, in three steps:

1. `plan`: what is deployed — the bundle as installed in the local store (its version, size and
   files decide the volume size and which engine can serve it), the trusted keys and threshold
   the pods verify under, the registry reference, replicas, resources, engine (sovpack serve on
   the GGUF, or vLLM on the safetensors originals);
2. `kubernetes`: the manifests as data — a ConfigMap of trusted keys (and of the registry's CA),
   a Deployment whose init container runs `sovpack pull` (full verification) into the pod's
   volume and whose main container serves it, a Service, a PodDisruptionBudget, a NetworkPolicy;
3. `write`: YAML files in a new directory, all or none.

This package knows nothing of the network: it writes files an operator reviews and applies.
"""
