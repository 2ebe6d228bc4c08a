package dev.chatpipe.interop;

import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;

/** Positional arguments plus {@code --name value} options and {@code --flag} switches. */
final class Args {
    final List<String> positional = new ArrayList<>();
    private final Map<String, String> options = new HashMap<>();

    Args(String[] argv, Set<String> flags) {
        for (int i = 0; i < argv.length; i++) {
            String a = argv[i];
            if (a.startsWith("--")) {
                String name = a.substring(2);
                int eq = name.indexOf('=');
                if (eq >= 0) {
                    options.put(name.substring(0, eq), name.substring(eq + 1));
                } else if (flags.contains(name)) {
                    options.put(name, "true");
                } else if (i + 1 < argv.length) {
                    options.put(name, argv[++i]);
                } else {
                    throw new IllegalArgumentException("option --" + name + " needs a value");
                }
            } else {
                positional.add(a);
            }
        }
    }

    String get(String name, String fallback) {
        return options.getOrDefault(name, fallback);
    }

    boolean flag(String name) {
        return Boolean.parseBoolean(options.getOrDefault(name, "false"));
    }

    String at(int index, String what) {
        if (index >= positional.size()) {
            throw new IllegalArgumentException("missing argument: " + what);
        }
        return positional.get(index);
    }

    static int jackson(Args args) {
        String v = args.get("jackson", "2");
        if (!v.equals("2") && !v.equals("3")) {
            throw new IllegalArgumentException("--jackson is 2 or 3, not " + v);
        }
        return Integer.parseInt(v);
    }
}
