"""drflow's configuration: the models of `drflow.yaml`, its validation, load and dump.

Every problem is reported at once, each with its field path (`groups[1].dns.ttl`) and the YAML
line it comes from. Secrets appear only as references (see `drflow.secrets`).
"""

from drflow.config.cron import cron_matches, cron_problem
from drflow.config.loader import ConfigError, Problem, dump_config, load_config, parse_config
from drflow.config.models import (
    AuditConfig,
    AwsConfig,
    DatabaseConfig,
    DnsConfig,
    DrflowConfig,
    DrillConfig,
    GatewayConfig,
    GroupConfig,
    NodeConfig,
    PolicyConfig,
    SiteConfig,
    SlackConfig,
    VCenterConfig,
    cross_check,
)

__all__ = [
    "AuditConfig",
    "AwsConfig",
    "ConfigError",
    "DatabaseConfig",
    "DnsConfig",
    "DrflowConfig",
    "DrillConfig",
    "GatewayConfig",
    "GroupConfig",
    "NodeConfig",
    "PolicyConfig",
    "Problem",
    "SiteConfig",
    "SlackConfig",
    "VCenterConfig",
    "cron_matches",
    "cron_problem",
    "cross_check",
    "dump_config",
    "load_config",
    "parse_config",
]
