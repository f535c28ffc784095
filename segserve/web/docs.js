// Swagger UI (BentoML's own copy, served from this service) on this service's spec; no validator badge (it
// would call validator.swagger.io) and nothing else from outside.
"use strict";
window.ui = SwaggerUIBundle({
  url: "docs.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
