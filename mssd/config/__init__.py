"""Settings: one TOML file plus ``MSSD_*`` environment overrides, validated at start.

This package owns the list of every setting, its type, default and meaning. The
rest of the code receives a validated :class:`Settings` object and never reads the
environment or the file itself. ``config/mssd.example.toml`` documents every key;
a test keeps the two in agreement.

Environment overrides are named ``MSSD_<SECTION>_<KEY>`` in upper case, for example
``MSSD_STORE_URL`` or ``MSSD_SMTP_MAX_MESSAGE_SIZE``; lists are comma-separated.
Relative paths are taken from the directory mssd is started in.

The package: ``sections`` declares every setting (one frozen dataclass per
section of the file), ``reading`` reads the file and the environment into them,
``checks`` validates what types alone cannot.
"""

from mssd.config.checks import parse_route, validate
from mssd.config.reading import all_keys, env_name, load
from mssd.config.sections import (
    DEPRECATED,
    SECTIONS,
    AnnuaireSettings,
    AuthSettings,
    ConfigError,
    DkimSettings,
    ImapSettings,
    PkiSettings,
    RelaySettings,
    ServerSettings,
    Settings,
    SmtpSettings,
    StoreSettings,
    TlsSettings,
    WhitelistSettings,
    dkim_key_dir,
    operator_ca_file,
    whitelist_cache_file,
)

__all__ = [
    "DEPRECATED",
    "SECTIONS",
    "AnnuaireSettings",
    "AuthSettings",
    "ConfigError",
    "DkimSettings",
    "ImapSettings",
    "PkiSettings",
    "RelaySettings",
    "ServerSettings",
    "Settings",
    "SmtpSettings",
    "StoreSettings",
    "TlsSettings",
    "WhitelistSettings",
    "all_keys",
    "dkim_key_dir",
    "env_name",
    "load",
    "operator_ca_file",
    "parse_route",
    "validate",
    "whitelist_cache_file",
]
