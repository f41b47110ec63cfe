"""Realistic value sets the chart is rendered with (each must render, lint clean and validate)."""

from __future__ import annotations

from typing import Any

HTPASSWD = "alice:$2y$05$0Z1M5f4lQ3TG0k8hAQbLPu7FfS1vA5m0fW8Qx1sJ5c4lO6s2uG3xK\n"
SIGNING_KEY = (  # an Ed25519 key made for these tests
    "-----BEGIN PRIVATE KEY-----\n"
    "MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF\n"
    "-----END PRIVATE KEY-----\n"
)

# Defaults as shipped: CloudNativePG's secret twinstore-db-app, the NATS chart's service nats.
DEFAULT: dict[str, Any] = {}

# One pod does everything: the API ingests and scores itself; inline URLs and users.
MINIMAL: dict[str, Any] = {
    "database": {"url": "postgresql://twinstore:pw@db:5432/twinstore"},
    "nats": {"url": "nats://nats:4222"},
    "auth": {"users": {"htpasswd": HTPASSWD}},
    "ingest": {"enabled": False},
    "anomaly": {"enabled": False},
    "migration": {"enabled": False},
}

# What an operator runs: replicas and autoscaling, ingress with TLS, secrets that exist already,
# monitoring, network policies, both adapters, signed audit checkpoints.
PRODUCTION: dict[str, Any] = {
    "image": {"repository": "registry.example.com/twinstore", "tag": "0.1.0"},
    "database": {"existingSecret": {"name": "twinstore-db-app", "key": "uri"}},
    "nats": {"existingSecret": {"name": "twinstore-nats", "key": "url"}},
    "auth": {
        "users": {"existingSecret": {"name": "twinstore-users", "key": "htpasswd"}},
        "jwt": {"existingSecret": {"name": "twinstore-jwt", "key": "issuers.json"}},
    },
    "audit": {
        "existingSecret": {"name": "twinstore-audit", "key": "ed25519.pem"},
        "checkpoint": {"enabled": True, "schedule": "*/30 * * * *"},
    },
    "settings": {
        "log_level": "info",
        "log_format": "json",
        "pool_size": 20,
        "max_body_bytes": 2097152,
        "events_max_age_seconds": 1209600,
        "partitions": 32,
        "ingest_sources": {"plant-mqtt": ["integration:plant-mqtt"], "plc-1": ["integration:plc-1"]},
        "search_indexes": ["attributes/floor", "features/env/properties/temperature"],
        "preauth_trusted": ["10.0.0.0/8"],
        "history_retention_days": 365,
        "shutdown_grace_seconds": 25,
    },
    "api": {
        "replicas": 3,
        "autoscaling": {
            "enabled": True,
            "minReplicas": 3,
            "maxReplicas": 10,
            "targetCPUUtilizationPercentage": 70,
            "targetMemoryUtilizationPercentage": 80,
        },
        "preStopSleepSeconds": 3,
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {
                    "matchLabels": {
                        "app.kubernetes.io/name": "twinstore",
                        "app.kubernetes.io/component": "api",
                    }
                },
            }
        ],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "api"}},
                        },
                    }
                ]
            }
        },
        "podAnnotations": {"example.com/team": "twins"},
    },
    "ingest": {"replicas": 2},
    "anomaly": {
        "replicas": 2,
        "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
    },
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "3600"},
        "hosts": [
            {
                "host": "twins.example.com",
                "paths": [{"path": "/api", "pathType": "Prefix"}, {"path": "/ws", "pathType": "Prefix"}],
            }
        ],
        "tls": [{"hosts": ["twins.example.com"], "secretName": "twins-example-com-tls"}],
    },
    "networkPolicy": {
        "enabled": True,
        "apiFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
        "databaseTo": [{"podSelector": {"matchLabels": {"cnpg.io/cluster": "twinstore-db"}}}],
        "natsTo": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "nats"}}}],
    },
    "adapters": [
        {
            "name": "plant-mqtt",
            "type": "mqtt",
            "config": {
                "nats_url": "nats://adapter:secret@nats:4222",
                "mqtt": {
                    "url": "mqtts://broker:8883",
                    "client_id": "twinstore-plant",
                    "username": "adapter",
                    "password": "secret",
                },
                "mappings": [{"topic": "plant/{namespace}/{thing}/{feature}/{property}", "value": "/value"}],
                "sparkplug": {"namespace": "org.acme"},
            },
            "persistence": {"size": "5Gi", "storageClassName": "fast"},
            "egress": [{"ports": [{"port": 8883, "protocol": "TCP"}]}],
        },
        {
            "name": "plc-1",
            "type": "opcua",
            "existingSecret": {"name": "plc-1-adapter", "key": "config.yaml"},
            "egress": [{"ports": [{"port": 4840, "protocol": "TCP"}]}],
        },
    ],
}

# Every secret given inline (the chart makes the Secrets), an adapter without a claim.
INLINE: dict[str, Any] = {
    "database": {"url": "postgresql://twinstore:pw@db:5432/twinstore"},
    "nats": {"url": "nats://user:pw@nats:4222"},
    "auth": {
        "users": {"htpasswd": HTPASSWD},
        "jwt": {
            "issuers": [
                {
                    "issuer": "https://login.example.com/realms/plant",
                    "prefix": "idp",
                    "subjects": ["{{ jwt:sub }}", "{{ jwt:groups }}"],
                    "jwks_url": "https://login.example.com/realms/plant/protocol/openid-connect/certs",
                },
                {"issuer": "ci", "prefix": "ci", "secret": "at-least-32-random-bytes-of-shared-secret"},
            ]
        },
    },
    "audit": {"signingKey": SIGNING_KEY, "checkpoint": {"enabled": True}},
    "api": {"replicas": 2},
    "settings": {"ingest_sources": {"plc-2": ["integration:plc-2"]}},
    "adapters": [
        {
            "name": "plc-2",
            "type": "opcua",
            "persistence": {"enabled": False},
            "config": {
                "opcua": {"endpoint": "opc.tcp://plc-2:4840/"},
                "nodes": [
                    {
                        "node_id": "ns=2;s=Pump1.Flow",
                        "thing_id": "org.acme:pump-1",
                        "path": "/features/flow/properties/value",
                    }
                ],
            },
        }
    ],
}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": DEFAULT,
    "minimal": MINIMAL,
    "production": PRODUCTION,
    "inline": INLINE,
}
