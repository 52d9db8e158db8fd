"""The SIP front end (pjsua2): ``ua`` (the pjsua thread), ``leg`` (one dialog), ``media`` (the call's audio
tap and bridge), ``inbound`` (an inbound call's state machine), ``server`` (INVITEs → agent calls), ``caller``
(``personagate call``)."""
