#!/usr/bin/python3 -S
"""Launcher of the guest agent; the ttci package sits beside this file."""

import sys

from ttci.agent.main import main

sys.exit(main())
