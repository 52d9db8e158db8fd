"""Call gateway: SIP/WebRTC front ends, audio path, routing, admin API. The CLI lives in gateway.cli."""
