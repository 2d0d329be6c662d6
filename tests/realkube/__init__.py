"""A real kube-apiserver + etcd for the tests, the ground truth for spegeld's API client.

See ``_apiserver`` (the launcher) and ``_accounts`` (RBAC from deploy/rbac.yaml, tokens
from TokenRequest, kubeconfigs written the way deploy/README.md tells users to).
"""
