"""MasKD's configuration: the ``MODEL.MASKD`` keys of yacs configs (:mod:`.defaults`) and the
loading of config files without running code from them (:mod:`.loading`)."""

from . import loading
from .defaults import add_maskd_config
from .loading import (
    SHIPPED_CONFIG_ROOT,
    ZOO_PREFIX,
    LazyYamlLoader,
    MasKDCfgNode,
    get_maskd_cfg,
    is_lazy_config,
    load_config,
    local_config_files,
    locate_name,
    partial_call,
    read_yaml,
    resolve_config_file,
    shipped_config_file,
)

__all__ = ["add_maskd_config", *loading.__all__]
