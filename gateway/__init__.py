"""Call gateway: SIP/WebRTC front ends, audio path, calls, tenants, admin API. The CLI lives in personagate.cli."""
