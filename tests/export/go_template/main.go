// Renders an Ollama TEMPLATE the way Ollama does (text/template over collated messages), so tests can
// compare it with the model's own Jinja rendering. Input on stdin: {"template", "system", "messages"}.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	msgs := in.Messages
	// Ollama inserts the Modelfile SYSTEM when the request has no system message of its own.
	if in.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: in.System}}, msgs...)
	}
	// Ollama's collate: merge consecutive messages of one role; .System joins all system texts.
	var collated []*Message
	var system []string
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == m.Role {
			collated[n-1].Content += "\n\n" + m.Content
			continue
		}
		collated = append(collated, &m)
	}
	tmpl := template.Must(template.New("").Parse(in.Template))
	data := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": collated, "Response": ""}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
