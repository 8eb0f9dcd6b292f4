"""Build the resolver the settings describe (backends in order, store cache)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from mssd.annuaire.cache import StoreCache
from mssd.annuaire.offline import ExtractionBackend
from mssd.annuaire.resolver import Backend, Resolver, ResolverPolicy
from mssd.config import AnnuaireSettings


def build_backend(name: str, settings: AnnuaireSettings, engine: AsyncEngine) -> Backend:
    if name == "extraction":
        return ExtractionBackend(engine)
    if name == "ldap":
        from mssd.annuaire.ldap import LdapBackend

        return LdapBackend.from_settings(settings)
    if name == "fhir":
        from mssd.annuaire.fhir import FhirBackend

        return FhirBackend.from_settings(settings)
    raise ValueError(f"unknown directory backend {name!r}")


def build_resolver(settings: AnnuaireSettings, engine: AsyncEngine) -> Resolver:
    return Resolver(
        [build_backend(name, settings, engine) for name in settings.backends],
        cache=StoreCache(engine),
        policy=ResolverPolicy(
            budget_seconds=settings.budget_seconds,
            cache_ttl_seconds=settings.cache_ttl_seconds,
            negative_ttl_seconds=settings.negative_ttl_seconds,
            search_limit=settings.search_limit,
        ),
    )
