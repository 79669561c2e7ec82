"""Test helpers for the GitHub integration: a loopback GitHub built from GitHub's OpenAPI
description, and GitHub's own webhook payloads signed as GitHub signs them."""
