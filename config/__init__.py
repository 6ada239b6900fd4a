"""crmstream configuration: the schema (``schema``) and where values come from (``loader``)."""

from crmstream.config.loader import ConfigError, default_config_text, load_config, mask_secrets
from crmstream.config.schema import CrmConfig

__all__ = ["ConfigError", "CrmConfig", "default_config_text", "load_config", "mask_secrets"]
