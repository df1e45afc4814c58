"""Every application key, declared once (aiohttp `web.AppKey`)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from events.projector import JobProjector
from events.settings import Settings
from events.store import SQLiteEventStore

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", SQLiteEventStore)
PROJECTOR = web.AppKey("projector", JobProjector)
#: Set when shutdown begins: long-lived streams end when it is set.
SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)

#: `request[TENANT]`: the tenant of the authenticated caller (set by the auth middleware).
TENANT = "tenant"
